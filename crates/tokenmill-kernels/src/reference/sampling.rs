// placeholder: the device sampler reference is being written.
