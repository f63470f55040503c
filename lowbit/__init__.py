"""lowbit: quantize trained PyTorch networks and measure what it costs."""
from lowbit.api import evaluate, prepare, quantize
from lowbit.deploy.artifact import load, save
from lowbit.deploy.onnx_export import export_onnx
from lowbit.deploy.runtime import OnnxModel
from lowbit.errors import LowbitError
from lowbit.model.as_float import as_float_model
from lowbit.model.quant_model import QuantModel
from lowbit.ptq.calibrate import calibrate
from lowbit.qat.engine import train_qat
from lowbit.quant.spec import QuantSpec
from lowbit.recipes.recipe import Recipe, builtin_names, load_recipe
from lowbit.report.analyzer import analyze
from lowbit.report.html import html_report

__version__ = "0.1.0"
__all__ = ["quantize", "train_qat", "evaluate", "prepare", "save", "load", "calibrate", "QuantModel", "QuantSpec", "Recipe",
           "load_recipe", "builtin_names", "analyze", "html_report", "LowbitError", "export_onnx", "as_float_model", "OnnxModel", "__version__"]
