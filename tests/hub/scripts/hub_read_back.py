"""Reads a pushed run back from the Hub at HF_ENDPOINT with huggingface_hub and datasets, and prints what it found as
JSON. Runs in its own process because huggingface_hub and datasets read HF_ENDPOINT when they are imported.
Usage: python hub_read_back.py <model_id> <stats_id> [<revision>]
"""

import hashlib
import json
import os
import sys


def main(model_id, stats_id, revision=None):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard, ModelCard, hf_hub_download, snapshot_download

    model_dir = snapshot_download(model_id, revision=revision)
    files = {}
    for root, _, names in os.walk(model_dir):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, model_dir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    card = ModelCard.load(hf_hub_download(model_id, "README.md", revision=revision))
    # `ModelCard.validate` posts to huggingface.co itself; the push already passed the server's /api/validate-yaml.
    # Here the metadata must survive huggingface_hub's own round trip, model-index included.
    metadata = card.data.to_dict()
    assert ModelCard(str(card)).data.to_dict() == metadata
    stats_card = DatasetCard.load(hf_hub_download(stats_id, "README.md", repo_type="dataset", revision=revision))
    steps = load_dataset(stats_id, "steps", split="train", revision=revision)
    histogram = load_dataset(stats_id, "histogram", split="train", revision=revision)
    stats_dir = snapshot_download(stats_id, repo_type="dataset", revision=revision)
    print(
        json.dumps(
            {
                "model_files": files,
                "card_tags": card.data.tags,
                "card_license": card.data.license,
                "card_text": card.text,
                "eval_results": [
                    [r.dataset_name, r.metric_type, r.metric_value] for r in (card.data.eval_results or [])
                ],
                "stats_card_text": stats_card.text,
                "stats_card_tags": stats_card.data.tags,
                "stats_configs": [c["config_name"] for c in stats_card.data.configs],
                "steps": steps.to_list(),
                "histogram": histogram.to_list(),
                "stats_files": sorted(os.listdir(stats_dir)),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
