"""The model card (``README.md``) a client writes beside each final model it saves.

It says what a user needs to pick the model up: the small model it came from,
the growth operators' shapes, the data and partition, the measured accuracy and
precision on the client's own test rows, the class names, the licence terms,
and the lines that load it with its library alone (the family's
``load_example``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

#: The card's file name in a saved model's folder (what the Hugging Face hub reads as a model card).
CARD_FILE = "README.md"


def model_card(
    *,
    title: str,
    origin: str,
    family: str,
    load_example: str,
    dataset: str,
    partition: str,
    metrics: Mapping[str, float | int],
    label_names: Sequence[str],
) -> str:
    """A model card in Markdown.

    Parameters
    ----------
    title : str
        What the model is (``"Grown 8x768x1536x12 BERT classifier"``).
    origin : str
        How it was made: the small model and the operator shapes, or the training it had.
    family : str
        The model family's name (``bert``, ``vit``).
    load_example : str
        Python lines that load it with its library alone; ``{path}`` stands for the folder.
    dataset, partition : str
        The run's data source, and the client's share of it (partitioner, partition id, rows).
    metrics : mapping
        ``accuracy``, ``precision`` (fractions) and ``num-examples`` (test rows) of the final evaluation.
    label_names : sequence of str
        The class names, by class index.

    Returns
    -------
    str
        The card's Markdown text.
    """
    labels = ", ".join(f"{i}: `{name}`" for i, name in enumerate(label_names))
    return f"""---
library_name: {"transformers" if family == "bert" else "timm" if family == "vit" else family}
tags: [fedgrow, ligo, federated-learning]
---

# {title}

Grown with FedGrow (Fed-Grow on LiGO: Shen et al., arXiv 2406.13450; Wang et al., ICLR 2023) by one
client of a federated run, from its private data; saved {datetime.now(UTC).strftime("%Y-%m-%d")} (UTC).

- **Origin**: {origin}
- **Data**: {dataset}; this client's partition: {partition}
- **Classes**: {labels}
- **Measured** on this client's own test rows ({int(metrics["num-examples"])} rows): accuracy
  {float(metrics["accuracy"]):.4f}, macro precision {float(metrics["precision"]):.4f}. Other clients'
  data differ: expect other numbers elsewhere.
- **Licence**: the weights derive from the small model and the data named above, whose licences apply;
  the code that grew them is Apache-2.0.

## Loading

```python
{load_example.format(path=".")}
```

Run from this folder, or put the folder's path in place of `"."`. With FedGrow installed,
`fedgrow_core.clients.model_export.class_names(".")` gives the class names and fails, naming the
folder, on a model that has none.
"""


def client_model_card(setup: object, title: str, origin: str, metrics: Mapping[str, float | int]) -> str:
    """:func:`model_card` for a client's final model, from its :class:`~fedgrow_core.clients.setup.ClientSetup`."""
    run = setup.run
    split = f"{run.partitioner}" + (f" (alpha {run.dirichlet_alpha})" if run.partitioner == "dirichlet" else "")
    return model_card(
        title=title,
        origin=origin,
        family=setup.small.family.name,
        load_example=setup.small.family.load_example,
        dataset=f"`{Path(setup.run.dataset).name}`",
        partition=f"partition {setup.partition_id}, {split}, {len(setup.train_rows)} training rows, seed {run.seed}",
        metrics=metrics,
        label_names=setup.label_names,
    )
