"""Low-level I/O, below everything else in ssmkit: bounded reads, atomic writes and safetensors files
(:mod:`ssmkit.io.files`), and checkpoints named by Hugging Face Hub id (:mod:`ssmkit.io.hub`)."""
