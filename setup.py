from setuptools import find_packages, setup

setup(
    name="maskdit",
    version="0.1.0",
    description="Fast, faithful MaskDiT (masked diffusion transformers) training with fused kernels",
    packages=find_packages(include=["maskdit", "maskdit.*", "kernels", "kernels.*"]),
    py_modules=["train", "sample"],
    python_requires=">=3.10",
    # torch is constrained, not pinned: the Makefile installs a matching build first (CPU on machines
    # without CUDA), so this requirement is already met and pip downloads nothing large.
    install_requires=["torch>=2.4", "numpy", "pillow", "scikit-learn", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "ruff", "triton", "diffusers", "scipy"],
        "triton": ["triton"],
        "bench": ["matplotlib"],
        "latents": ["diffusers"],  # the VAE of the latent pipeline (python -m maskdit.prepare_latents)
        "fid": ["torch-fidelity", "scipy"],  # Inception features for python -m maskdit.evaluate
    },
)
