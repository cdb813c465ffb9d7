"""How the process runs on its hardware: the host allocator, the CPU matmul library, multi-host
start-up, and the hardware's tabulated and measured speed. Imports nothing else of esm3_jax."""
