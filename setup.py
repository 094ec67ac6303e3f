from setuptools import find_packages, setup

setup(
    name="spmd-diff",
    version="0.1.0",
    description="SPMD batch engine for bulk video generation with diffusion transformers on GPU clusters",
    python_requires=">=3.10",
    packages=find_packages(include=["spmd_diff", "spmd_diff.*"]),
    # Everything imported at run time, with the versions tested (lower bounds) and upper bounds where a newer
    # major version is known or expected to break the model code (diffusers' Wan classes, transformers' UMT5,
    # torch's dispatch). accelerate: diffusers needs it to load Wan's transformer (keep_in_fp32_modules).
    install_requires=[
        "numpy>=1.26,<3",
        "h5py>=3.10,<4",
        "mpi4py>=3.1,<5",
        "torch>=2.4,<3",
        "diffusers>=0.35,<0.50",
        "transformers>=4.46,<6",
        "accelerate>=1.0,<2",
        "tokenizers>=0.20,<1",
        "sentencepiece>=0.2,<1",
        "protobuf>=4,<8",
        "ftfy>=6,<7",
        "Pillow>=10,<14",
        "av>=18.1,<19",  # PyAV: FFmpeg with libx264/libx265 in its wheel (output.video = h264/hevc, export)
        "hdf5plugin>=7.1,<8",  # output.compression = "zstd"
    ],
    extras_require={
        "report": ["matplotlib>=3.7,<4", "imageio>=2.30,<3", "imageio-ffmpeg>=0.5,<1", "tqdm>=4.60,<5"],
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "hypothesis>=6.100,<7",
                 "webdataset>=1.0.2,<2"],
    },
    entry_points={"console_scripts": ["spmd-diff=spmd_diff.cli:main"]},
)
