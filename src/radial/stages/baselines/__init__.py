"""Baselines the routed models are measured against, each a workflow stage and an evaluation variant.

    shortgpt   ShortGPT static pruning (arXiv 2403.03853): drop the k layers of lowest Block
               Influence from the profile; variant `shortgpt-k{k}`.
    soft       Sorted fine-tuning (SoFT, arXiv 2309.08968): one model fine-tuned so that its first n
               layers, through the shared final norm and LM head, are a sub-model for every exit n.
    soft-exit  SoFT variants over the fine-tuned model: the first n layers (`soft-exit{n}`), or a
               confidence-threshold early exit (`soft-conf{threshold}`).
    dlo        DLO-style token skipping (arXiv 2407.11030): per-layer linear routers trained during
               fine-tuning on cosine-similarity labels; variant `dlo-c{capacity}`.

Each writes a variant folder (radial.variant_folders) that the evaluation stage treats like the
dense model.
"""
