"""Task metrics while training: at each evaluation the model being trained answers the eval records
(greedy, batched, volume features computed once per volume) and `medmvl eval`'s own scoring turns
the answers into exact match, LLaVA-Med closed accuracy / open recall, choice accuracy, BLEU and
ROUGE, reported beside the eval loss as `eval_<metric>`.

With several ranks each answers its share of the records and every rank scores all the answers,
so all of them report (and pick the best checkpoint by) the same numbers. Shares are padded to
the same number of batches: under ZeRO-3 every rank must run the same number of forwards.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from medmvl_cli.config.schema import Recipe

logger = logging.getLogger(__name__)

class GenerationEval:
    """Answers and scores `recipe.data.eval` (the first `train.eval_max_samples` records)."""

    def __init__(self, recipe: Recipe, processor):
        from medmvl_cli.inference.generate import GenerationSettings

        self.processor = processor
        self.questions = eval_questions(recipe)
        self.settings = GenerationSettings(max_new_tokens=recipe.train.eval_max_new_tokens)
        self.batch_size = recipe.train.batch_size
        self.name = Path(recipe.output_dir).name
        self.max_voxels, self.max_pixels = recipe.data.max_voxels, recipe.data.max_pixels

    def __call__(self, model, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """{"eval_<metric>": value} for every metric the answers allow."""
        from medmvl_cli.inference.generate import Predictor
        from medmvl_cli.inference.predictions import answer_in_batches, order_for_batching

        predictor = Predictor.for_model(model, self.processor, self.name,
                                        max_voxels=self.max_voxels, max_pixels=self.max_pixels)
        share, real = self._share(order_for_batching(self.questions, predictor.placeholder_lengths), rank, world_size)
        was_training = model.training
        model.eval()
        try:
            rows = [row for _, batch_rows in answer_in_batches(predictor, share, self.settings, self.batch_size)
                    for row in batch_rows]
        finally:
            model.train(was_training)
        return score(_gather(rows[:real], world_size))

    def _share(self, questions: list, rank: int, world_size: int) -> tuple[list, int]:
        """This rank's questions and how many are its own: padded by repeating one so that every
        rank runs the same number of batches."""
        if world_size <= 1:
            return questions, len(questions)
        per_rank = math.ceil(len(questions) / world_size / self.batch_size) * self.batch_size
        mine = questions[rank * per_rank:(rank + 1) * per_rank]
        return mine + (mine[-1:] or questions[-1:]) * (per_rank - len(mine)), len(mine)


def eval_questions(recipe: Recipe) -> list:
    """The questions of the eval files, in file order, at most `train.eval_max_samples`."""
    from medmvl_cli.data.annotations import AnnotationFile, default_root, parse_record
    from medmvl_cli.inference.predictions import to_question

    cap = recipe.train.eval_max_samples
    questions = []
    for spec in recipe.data.eval:
        image_root = default_root(spec.annotations, spec.image_root)
        volume_root = default_root(spec.annotations, spec.volume_root)
        for raw in AnnotationFile(Path(spec.annotations)):
            if cap is not None and len(questions) >= cap:
                return questions
            questions.append(to_question(parse_record(raw), image_root, volume_root))
    return questions


def _gather(rows: list[dict], world_size: int) -> list[dict]:
    """Every rank's rows, in rank order, on every rank."""
    if world_size <= 1:
        return rows
    import torch.distributed as dist

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, rows)
    return [row for rank_rows in gathered for row in rank_rows]


def score(rows: list[dict]) -> dict[str, float]:
    """`medmvl eval`'s averages over prediction rows, as {"eval_<key>": value} (computed ones only)."""
    from medmvl_cli.evaluation.predictions_file import PredictionRow
    from medmvl_cli.evaluation.report import score_rows

    parsed = [PredictionRow(line=i + 1, id=row["id"], prediction=row.get("prediction"), answer=row.get("answer"),
                            question_type=row.get("question_type"), error=row.get("error"), model=row.get("model"))
              for i, row in enumerate(rows)]
    _, report = score_rows(parsed, bertscore=False)
    metrics = {f"eval_{r.key}": r.value for r in report.metrics if r.value is not None}
    metrics["eval_answered"] = report.counts["scored"]
    return metrics
