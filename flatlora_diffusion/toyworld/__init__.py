"""The toy world: a procedural image world with its own trained SD base, encoders and ground-truth oracle.

Modules, one idea each:

* `world`: the vocabulary (objects, colours, patterns, scenes), random scenes and their captions;
* `render`: a scene to a 64x64 image, deterministically;
* `subjects`: the DreamBooth subjects (never in pretraining) and their DreamBench-layout files;
* `text`: the word-level tokenizer;
* `data`: render pools, labels and augmentation for training;
* `architectures`: the stock diffusers/transformers classes at toy sizes;
* `oracle`: the judge that reads images back into attributes;
* `pretrain`: the seeded, resumable pretraining of every toy model;
* `registry`: the shipped `toy:*` models and their checksums;
* `quality`: caption following and subject fidelity, read by the oracle;
* `experiment`: DreamBooth before/after on the toy subjects.

Users reach the models only through model ids (`toy:sd`, `toy:clip`, `toy:vit`, `toy:oracle`),
which resolve to standard Hugging Face folders (`flatlora_diffusion.model_ids`).
"""
