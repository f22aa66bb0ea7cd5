"""BiT fine-tuning in TensorFlow 2 (Keras 3).

TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with
AVX512_VNNI, AVX512_BF16 or AMX; elsewhere (AVX2) it trains on slower
kernels (docs/performance.md#tensorflows-onednn-kernels). The backend asks
for oneDNN on every CPU unless the user has set TF_ENABLE_ONEDNN_OPTS, which
TensorFlow reads once, when it is first imported.
"""
import os

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
