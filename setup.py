from setuptools import find_packages, setup

setup(
    name="spmd-diff",
    version="0.1.0",
    description="SPMD batch engine for bulk video generation with diffusion transformers on GPU clusters",
    python_requires=">=3.10",
    # Every subpackage of spmd_diff, plus the top-level kernels/ folder installed as spmd_diff.kernels.
    packages=find_packages(include=["spmd_diff", "spmd_diff.*"]) + ["spmd_diff.kernels"],
    package_dir={"spmd_diff.kernels": "kernels"},
    install_requires=[
        "numpy",
        "h5py",
        "mpi4py>=3.1",
        "torch",
        "diffusers>=0.35",
        "transformers",
        "tokenizers",
        "sentencepiece",
        "protobuf",
        "ftfy",
    ],
    extras_require={
        "report": ["matplotlib", "imageio", "imageio-ffmpeg", "tqdm"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
    },
    entry_points={"console_scripts": ["spmd-diff=spmd_diff.cli:main"]},
)
