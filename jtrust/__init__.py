"""jtrust: the trustworthiness of language models, studied from the inside, in JAX.

    import jtrust
    model = jtrust.load("smollm2")                     # or a .gguf, HF dir, jtrust dir, series
    acts = jtrust.extract(model, texts, sites=("resid_post",), pool="last")
    out = jtrust.generate(model, ["What is trust?"], max_new_tokens=32, chat=True)
"""

from jtrust.runtime import distributed
from jtrust.runtime.extract import Activations, extract, load_activations
from jtrust.runtime.generate import Sampling, generate
from jtrust.io.loading import convert, load, load_series
from jtrust.models.model import Model, Series
from jtrust.models.decoder import Capture, forward
from jtrust.models.interventions import Intervention, at_layer

__version__ = "0.1.0"
__all__ = ["Activations", "Capture", "Intervention", "Model", "Sampling", "Series", "at_layer",
           "convert", "distributed", "extract", "forward", "generate", "load", "load_activations",
           "load_series"]
