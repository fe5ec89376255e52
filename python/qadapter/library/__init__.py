"""The library: a frozen causal LM with a LoRA residual Q-function (model), its trainer, the hidden
states the fused loss takes, preference data, saving without loss, and the embedded default model.
Imports only ``qadapter_kernels`` and itself."""
