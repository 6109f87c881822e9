"""Hot paths of the engine, one family per file.

`<family>.py` holds the public function and its torch reference (the CPU production path and the test
oracle); `<family>_triton.py` beside it holds the Triton kernel, imported only when a CUDA tensor arrives,
so a CPU-only install never needs triton. The public function of each family dispatches through
`dispatch.use_triton`: Triton for CUDA tensors when Triton is importable (and `LLM_DISABLE_TRITON` is not
1), else the reference. The paged KV cache of one layer is a pair of tensors shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`; a token's slot is `block * block_size + offset`.

Start-up helpers for the engine: `hardware.detect_hardware` (device, dtype, kernels, block size: the
profile to log and report) and `cuda_graphs.DecodeGraphRunner` (decode-step capture and padded replay).
"""
