"""Which library XLA:CPU runs plain matmuls with, chosen per compiled program.

XLA:CPU hands lone matmuls to YNNPACK by default, and to Eigen when YNNPACK is limited to its
reduction fusions. Eigen is the default because the train step measured faster with it on both
CPU machines this project was developed on; YNNPACK keeps the reductions (layer-norm and softmax
statistics), which it runs faster than XLA's own loops. The measurements and their commands are in
BENCHMARKS.md; `esm3-jax bench train-step --against train.cpu_matmul=ynn` repeats them on any machine.
The choice travels as a compiler option of one program (`jax.jit(compiler_options=...)`), so
nothing process-wide changes, and it is not passed for other platforms.
"""

from __future__ import annotations

LIBRARIES = ("eigen", "ynn")
# What the train and eval steps (train.cpu_matmul), inference and the benches use unless told otherwise.
DEFAULT = "eigen"
# The option names one fusion type per program; REDUCE alone leaves YNNPACK no matmuls.
_EIGEN_MATMULS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(platform: str, library: str) -> dict[str, str] | None:
    """`jax.jit` compiler options that run plain matmuls with `library` on the CPU; None elsewhere.

    "ynn" is XLA's own default, so it returns None: the program compiles exactly as XLA would.
    """
    if library not in LIBRARIES:
        raise ValueError(f"unknown CPU matmul library {library!r}; choose one of {', '.join(LIBRARIES)}")
    if platform != "cpu" or library == "ynn":
        return None
    return dict(_EIGEN_MATMULS)
