"""Scoring predictions: LLaVA-Med closed accuracy / open recall, exact match, multiple choice,
BLEU, ROUGE, METEOR and BERTScore (see docs/evaluation.md).

Importing this package stays cheap: NLTK, sacrebleu and rouge_score load only when a metric needs them.
"""

from medmvl_cli.evaluation.report import EvalReport, MetricResult, evaluate_predictions, scores_path_for

__all__ = ["EvalReport", "MetricResult", "evaluate_predictions", "scores_path_for"]
