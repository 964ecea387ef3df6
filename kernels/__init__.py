"""GPU kernels (Triton, cuDNN) for the model's hot paths, each beside the torch-op reference that computes the
same values everywhere else (the CPU, CUDA without Triton) and a fake for `torch.compile`. Custom ops live in
the one namespace `torch.ops.flux`."""
