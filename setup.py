from setuptools import find_packages, setup

setup(
    name="esm3-jax",
    version="0.1.0",
    description="ESM3, the multimodal protein language model, in JAX/Flax: training at scale, "
    "inference, and interoperability with the official PyTorch weights",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["esm3_jax", "esm3_jax.*"]),
    include_package_data=True,
    install_requires=[
        "jax>=0.7,<0.12",  # 0.11: the JAX found on current GPU images (launch/gpu_check.sh)
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorstore>=0.1.70",
        "grain>=0.2.10,<0.3",
        "array_record>=0.7",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "gemmi>=0.7,<0.8",
        "biotite>=1.2,<2",
        "tmtools>=0.2",
        "scipy>=1.10",
        "filelock>=3",  # JAX's compilation cache needs it to keep the folder under a size (runtime/compile_cache.py)
    ],
    extras_require={
        # The reference implementation, for parity tests and side-by-side benchmarks. torch is
        # pinned to the CPU build; an unpinned `esm` would pull a multi-GB CUDA build.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "torch==2.13.0",
            "esm==3.2.1.post1",
            "httpx",  # imported by esm but not declared by it
            "freesasa==2.2.1",  # cross-check of our Shrake-Rupley SASA
            "matplotlib",  # plot-metrics
            "import-linter>=2.1",  # lint-imports: the package's layers (.importlinter)
        ],
        # Ahead-of-time compilation for TPU topologies from any machine (`esm3-jax aot`).
        "tpu-aot": ["libtpu"],
        # `esm3-jax preprocess --runner direct|dataflow|flink|spark`: preprocessing on Apache Beam.
        # For gs:// paths and the Dataflow runner install apache-beam[gcp] instead.
        "beam": ["apache-beam>=2.60,<3"],
        "wandb": ["wandb"],
        "plot": ["matplotlib"],  # esm3-jax plot-metrics
    },
    entry_points={"console_scripts": ["esm3-jax=esm3_jax.cli:main"]},
)
