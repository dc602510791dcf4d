"""The applications: txt2img, img2img, inpaint, convert, random checkpoints (each with its ``main``), the shared
flags and one-line errors (``cli``), image inputs (``pipelines``) and PNG files (``images``)."""
