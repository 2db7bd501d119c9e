"""Model compression: a Keras model in, measured TFLite variants per device profile out.

``recipes`` names what a variant is (transforms, then a quantization);
``pruning`` (tensorflow-model-optimization, in a child process),
``distill`` and ``lowrank`` transform the Keras model; ``convert`` turns it
into a flatbuffer; ``pipeline`` builds every candidate, measures it in the
agents' interpreter and picks one; ``evalset`` reads and slices the user's
data; ``digits`` trains the small demo model. Only this package imports
TensorFlow, and only ``prune_worker`` (a child process) imports tf-keras.
"""
