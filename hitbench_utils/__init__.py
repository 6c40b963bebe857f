"""hitbench: resumable, truncating RealHiTBench evaluation of vision-language models.

Importing the package is cheap and has no side effects; torch is imported only by the modules that
run a model (backends, engine, run).
"""
__version__ = "0.1.0"
