"""Train, evaluate, export and build the emotion model (``python -m model_export --help``)."""

#: the ONNX opset ``model_export export`` writes unless told otherwise, and the MTCNN nets' (``mtcnn_export``)
OPSET = 17
#: the oldest opset accepted: at 12 the encoder tf2onnx exports fails in ONNX Runtime, and the
#: views ``ensemble`` builds need ``ReduceSum`` with its axes as an input, which came in 13
MIN_OPSET = 13
