from .nodes import Graph, Node
from .onnx_loader import load_onnx
from .trace import build_graph

__all__ = ["Graph", "Node", "build_graph", "load_onnx"]
