"""Hot paths of the engine, one family per file.

Each file holds a torch reference (the CPU path and the test oracle) and, where written, a Triton kernel.
The public function of each family dispatches: Triton for CUDA tensors when Triton is importable,
else the reference. The paged KV cache of one layer is a pair of tensors shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`; a token's slot is `block * block_size + offset`.
"""
