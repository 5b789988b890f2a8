"""The main job, ``python -m optimizer demo``: a small LLaMA trained on bundled text
with each optimizer under a warmup schedule (see :mod:`optimizer.demo.train`)."""
