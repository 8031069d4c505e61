//! Every kernel of kernels/*.cu, run by the emulator, against its CPU
//! reference: the same suite `tokenmill gpu kernels` runs on a GPU
//! (tokenmill_kernels::check), on fresh random inputs each run.

use tokenmill_kernels::check::{self, CheckReport};
use tokenmill_kernels::testing::Rng;
use tokenmill_kernels_emu::Emulator;

fn seed() -> u64 {
    let seed = std::env::var("TOKENMILL_KERNEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("inputs from seed {seed} (TOKENMILL_KERNEL_SEED={seed} repeats them)");
    seed
}

fn assert_all_pass(reports: &[CheckReport]) {
    for r in reports {
        eprintln!("{r}");
    }
    let failed: Vec<_> = reports.iter().filter(|r| !r.passed).collect();
    assert!(
        failed.is_empty(),
        "{} of {} checks failed: {failed:#?}",
        failed.len(),
        reports.len()
    );
}

fn check_type<T: tokenmill_kernels::Element>()
where
    Emulator: check::KernelBackend<T>,
{
    let emulator = Emulator::default();
    let mut rng = Rng::new(seed());
    let reports = check::check_type::<T, _>(&emulator, &mut rng, emulator.multiprocessors)
        .expect("every launch runs");
    assert!(reports.len() > 40);
    assert_all_pass(&reports);
}

#[test]
fn f32_kernels_match_their_references() {
    check_type::<f32>();
}

#[test]
fn bf16_kernels_match_their_references() {
    check_type::<half::bf16>();
}

#[test]
fn f16_kernels_match_their_references() {
    check_type::<half::f16>();
}

#[test]
fn the_sampler_matches_its_reference_to_the_bit() {
    let reports = check::check_sampling(&Emulator::default(), seed());
    assert_eq!(reports.len(), 6 * 3);
    assert_all_pass(&reports);
}
