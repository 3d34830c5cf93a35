"""`wmtp score-reference`: Rho-1's command, declared here without torch (`wmtp.weighting.COMMANDS` names this
module); it scores the training set with the reference model once and writes the config's `reference_cache`."""

from __future__ import annotations

import time

from .. import CommandInputs, SchemeCommand, scheme_config, scheme_settings


def score_reference(inputs: CommandInputs) -> int:
    """Check the config and recipe, read the run's data, score it with the reference and write the cache."""
    from ...runtime.distributed import resolve_device
    from ...runtime.precision import autocast_for
    from ..reference import load_reference, score_reference_set
    from .cache import write_cache
    from .scheme import reference_cache_key, reference_cache_target

    config, recipe = inputs.config, inputs.recipe
    sections = scheme_config(config, "rho1")
    target = reference_cache_target(sections, recipe)
    scheme_settings(recipe)
    device = resolve_device(config.compute.device)
    data = inputs.load_data()
    reference = load_reference(sections.reference_model, data.tokenizer, device)
    started = time.monotonic()
    ref = score_reference_set(reference, data.train_set, recipe.train.micro_batch_size,
                              autocast_for(device, config.compute.precision), device, recipe.loss.chunk_size)
    key = reference_cache_key(data.train_set, data.tokenizer, sections.reference_model)
    write_cache(target, ref, key)
    print(f"scored {len(data.train_set)} sequences ({data.train_set.n_tokens} tokens) in "
          f"{time.monotonic() - started:.1f}s -> {target} (fingerprint {key[:12]})")
    return 0


COMMAND = SchemeCommand(name="score-reference", help="Rho-1: score the training set with the reference model once "
                        "and write the config's reference_cache", run=score_reference)
