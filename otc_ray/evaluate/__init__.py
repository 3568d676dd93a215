"""Evaluation metrics: pure functions on embeddings returning flat ``dict[str, float]`` for MLflow,
plus thin wrappers that take an `Encoder`. One definition per metric (docs/method.md, Metrics)."""
from otc_ray.evaluate.asr import (
    backdoor_asr,
    backdoor_asr_from_predictions,
    evaluate_backdoor,
    evaluate_targeted,
    targeted_asr,
    targeted_asr_from_predictions,
)
from otc_ray.evaluate.detection import damage_metrics, detection_auroc, detection_metrics, poison_mask
from otc_ray.evaluate.encoder import Encoder, encode_images, encode_texts
from otc_ray.evaluate.linear_probe import LinearProbe, evaluate_linear_probe, fit_linear_probe, linear_probe_metrics
from otc_ray.evaluate.retrieval import evaluate_retrieval, retrieval_metrics
from otc_ray.evaluate.zeroshot import (
    build_zeroshot_classifier,
    class_index,
    classifier_from_text_embeddings,
    evaluate_zeroshot,
    expand_templates,
    topk_accuracy,
    zeroshot_logits,
    zeroshot_metrics,
    zeroshot_predict,
)

__all__ = [
    "Encoder", "encode_images", "encode_texts",
    "expand_templates", "classifier_from_text_embeddings", "build_zeroshot_classifier", "class_index",
    "zeroshot_logits", "zeroshot_predict", "topk_accuracy", "zeroshot_metrics", "evaluate_zeroshot",
    "LinearProbe", "fit_linear_probe", "linear_probe_metrics", "evaluate_linear_probe",
    "backdoor_asr_from_predictions", "backdoor_asr", "targeted_asr_from_predictions", "targeted_asr",
    "evaluate_backdoor", "evaluate_targeted",
    "poison_mask", "detection_metrics", "detection_auroc", "damage_metrics",
    "retrieval_metrics", "evaluate_retrieval",
]
