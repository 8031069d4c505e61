//! The emulator itself: it runs correct CUDA as a GPU would and reports
//! the mistakes a GPU would turn into wrong results or hangs
//! (emu/selftest.cu holds the kernels).

use tokenmill_kernels::geometry::Launch;
use tokenmill_kernels_emu::{launch, Buffer, EmuError};

fn block(threads: u32, blocks: u32, shared_bytes: u32) -> Launch {
    Launch {
        grid: (blocks, 1, 1),
        block: threads,
        shared_bytes,
    }
}

fn launch_error(result: Result<(), EmuError>) -> String {
    match result {
        Err(EmuError::Launch(message)) => message,
        other => panic!("expected a launch error, got {other:?}"),
    }
}

#[test]
fn barriers_and_shuffles_compute_what_a_gpu_would() {
    let (threads, blocks) = (96usize, 3usize);
    let input: Vec<f32> = (0..threads * blocks)
        .map(|i| (i % 17) as f32 - 8.0)
        .collect();
    let (inp, sums, neighbours) = (
        Buffer::from_slice(&input),
        Buffer::from_slice(&vec![0f32; blocks]),
        Buffer::from_slice(&vec![0f32; threads * blocks]),
    );
    launch(
        "tm_selftest_sums",
        block(threads as u32, blocks as u32, 0),
        &[&inp.ptr(), &sums.ptr(), &neighbours.ptr()],
    )
    .unwrap();
    let want_sums: Vec<f32> = input.chunks(threads).map(|c| c.iter().sum()).collect();
    assert_eq!(sums.read(), want_sums);
    let want_neighbours: Vec<f32> = (0..threads * blocks)
        .map(|i| input[i - i % 32 + (i + 1) % 32])
        .collect();
    assert_eq!(neighbours.read(), want_neighbours);
}

#[test]
fn a_missing_barrier_shows_in_the_result() {
    let out = Buffer::from_slice(&[0f32; 128]);
    launch(
        "tm_selftest_missing_barrier",
        block(128, 1, 4),
        &[&out.ptr()],
    )
    .unwrap();
    // Threads that ran before thread 0 read the poison (NaN) that fills
    // shared memory at the start of every block.
    let read = out.read();
    assert!(read.iter().any(|v| v.is_nan()), "{read:?}");
    assert!(read.contains(&1.0), "{read:?}");
}

#[test]
fn a_divergent_barrier_is_reported_not_hung() {
    let out = Buffer::from_slice(&[1f32; 64]);
    let message = launch_error(launch(
        "tm_selftest_divergent_barrier",
        block(64, 1, 0),
        &[&out.ptr()],
    ));
    assert!(message.contains("different barriers"), "{message}");
}

#[test]
fn a_shuffle_missing_lanes_is_reported() {
    let out = Buffer::from_slice(&[1f32; 64]);
    let message = launch_error(launch(
        "tm_selftest_shuffle_after_exit",
        block(64, 1, 0),
        &[&out.ptr()],
    ));
    assert!(message.contains("31 of 32 lanes"), "{message}");
}

#[test]
fn a_write_past_shared_memory_is_reported() {
    let message = launch_error(launch(
        "tm_selftest_shared_overrun",
        block(32, 2, 64),
        &[&16i32],
    ));
    assert!(message.contains("past the 64 bytes"), "{message}");
    // Within bounds, the same kernel is fine.
    launch("tm_selftest_shared_overrun", block(32, 2, 64), &[&15i32]).unwrap();
}

#[test]
#[should_panic(expected = "wrote outside a buffer of 8 elements")]
fn a_write_past_a_buffer_is_caught() {
    let out = Buffer::from_slice(&[0f32; 8]);
    launch(
        "tm_selftest_global_overrun",
        block(32, 1, 0),
        &[&out.ptr(), &8i32],
    )
    .unwrap();
    out.read();
}

#[test]
fn arguments_are_checked_against_the_kernel_signature() {
    let out = Buffer::from_slice(&[0f32; 8]);
    match launch(
        "tm_selftest_global_overrun",
        block(32, 1, 0),
        &[&out.ptr(), &8i64],
    ) {
        Err(EmuError::Signature {
            expected, given, ..
        }) => {
            assert_eq!((expected.as_str(), given.as_str()), ("pi", "pl"));
        }
        other => panic!("expected a signature error, got {other:?}"),
    }
    assert!(matches!(
        launch("tm_no_such_kernel", block(32, 1, 0), &[]),
        Err(EmuError::UnknownKernel(_))
    ));
}
