"""Model compression: Keras model in, one TFLite variant per quantization out.

``quantization`` names the variants, ``evalset`` reads and slices the user's
evaluation data, ``convert`` is the only module that imports TensorFlow,
``host_eval`` measures a variant with the same interpreter and benchmark the
agents use, and ``digits`` trains the small demo model the tests and the demo
rely on.
"""
