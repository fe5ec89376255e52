"""qadapter: the thin model and trainer layer over qadapter_kernels (Hugging Face transformers + PEFT)."""
