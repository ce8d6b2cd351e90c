"""Convert original TimeSformer checkpoints to Hugging Face transformers, and verify the conversion.

Modules: ``variants`` (the released models), ``rules`` (the rename table), ``checkpoint`` (safe loading), ``config``
(shape inference), ``convert`` (checked conversion), ``inference`` (running a converted model as the original ran),
``reference`` (an independent implementation of the original model), ``verify`` and ``golden`` (the checks the test
suite runs), ``download`` and ``cache`` (fetching released files), ``video`` (clip preprocessing), ``cli``.
"""

__version__ = "0.1.0"
# Bump when a conversion of the same input would change: it is written into every converted config and is part of
# every cache key for conversions.
CONVERTER_VERSION = "1"
