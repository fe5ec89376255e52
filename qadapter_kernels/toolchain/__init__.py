"""Build tooling, apart from what runs inside a loss: where builds are cached, the CUDA
architectures to build for, the CUDA extension's build command (``build_cuda``) and the
ahead-of-time compile check of the Triton kernels (``aot_check``)."""
