"""The evaluation tasks, one class each: how one cached sample is prompted and predicted, how the predictions are
scored beside a trivial baseline, and which plots show them. `TASKS` maps the names `EvalConfig.task` takes to
the classes; a task's settings are the eval config's fields of the same names (e.g. `season`).

Predictions arrive a shard at a time and are scored as they come (`Tally`): what scoring needs is kept, never a
test set's every forecast (the paper's Traffic set: 2.9M windows of 816 values)."""

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from preprocessing.readers.llava import answer_letter

from .metrics.asr import character_error_rate, word_error_rate
from .metrics.choice import choice_accuracy, extract_choice, pope_scores
from .metrics.forecast import ForecastErrors, seasonal_naive
from .metrics.vqa import answer_key, best_constant_answer, mean_exact_match, mean_vqa_accuracy
from .plots import figure, save_figure
from .row_sample import RowSample

if TYPE_CHECKING:
    from modrwkv.conversation import Sample

TaskName = Literal["vqa", "asr", "forecast"]


class Tally(ABC):
    """A task's scores, running: the rows of each predicted shard are added as it arrives."""

    @abstractmethod
    def add(self, rows: list[dict]) -> None:
        """Scored rows (none skipped)."""

    @abstractmethod
    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics, the trivial baseline's metrics) over the rows added."""


@dataclass
class EvalTask(ABC):
    modality: ClassVar[str]  # the feature cache it reads
    unsaved: ClassVar[tuple[str, ...]] = ()  # row fields scoring reads that the predictions file leaves out

    @classmethod
    def from_config(cls, config) -> "EvalTask":
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def predict(self, model, tokenizer, samples: list["Sample"]) -> list[dict]:
        """The samples' rows (key, language, prediction and reference, and what scoring and plots need beyond),
        in order; tasks answer several samples in one pass of the model where they can. A sample the model cannot
        take (an item compressed to nothing) is not predicted: its row says why (`skipped`), with what scoring it as
        unanswered needs (`unanswered`)."""
        # torch and the model package (which imports torch) load in the prediction actors only, not the driver
        import torch

        from modrwkv.batching import TooShort, item_lengths, sample_features
        from modrwkv.conversation import prompt_ids

        device = model.backbone.emb.weight.device
        taken, prompts, features, skipped = [], [], [], {}
        for index, sample in enumerate(samples):
            items = sample_features(sample)
            try:
                prompts.append(prompt_ids(tokenizer, sample.text("user"), item_lengths(model.config, items, sample.key),
                                          sample.key))
            except TooShort as e:
                skipped[index] = {"skipped": str(e), **self.unanswered(sample)}
                continue
            taken.append(sample)
            features.append([(m, f.to(device)) for m, f in items])
        with torch.no_grad():
            answers = iter(self.answer(model, tokenizer, taken, prompts, features))
        return [{"key": s.key, "language": s.meta.get("language"), **(skipped.get(i) or next(answers))}
                for i, s in enumerate(samples)]

    @abstractmethod
    def answer(self, model, tokenizer, samples: list["Sample"], prompts: list[list[int]], features: list) -> list[dict]:
        """The model's predictions, with the references, for the samples' prompt ids and feature items."""

    def unanswered(self, sample: "Sample") -> dict:
        """A skipped sample's row as scored, or {} when it is left out of the scores (counted in `rows_skipped`)."""
        return {}

    @abstractmethod
    def score(self, rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics, the trivial baseline's metrics) over the predicted rows."""

    def tally(self) -> Tally:
        """Running scores: by default the rows are kept (a text answer's are a few hundred bytes) and scored at the
        end."""
        return KeptRows(self)

    def saved(self, row: dict) -> dict:
        """The row as the predictions file holds it."""
        return {k: v for k, v in row.items() if k not in self.unsaved}

    def plots(self, tally: Tally, out_dir: Path) -> list[Path]:
        return []


@dataclass
class KeptRows(Tally):
    task: EvalTask
    rows: list[dict] = field(default_factory=list)

    def add(self, rows: list[dict]) -> None:
        self.rows += rows

    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        return self.task.score(self.rows)


@dataclass
class DecodeTask(EvalTask):
    """Answered in text: greedy decoding up to the end of the assistant's turn, `batch_size` prompts at a time
    (prefilled together with right padding, decoded together, each row dropped when it stops)."""

    max_new_tokens: int = 16
    batch_size: int = 16

    def answer(self, model, tokenizer, samples: list["Sample"], prompts: list[list[int]], features: list) -> list[dict]:
        from modrwkv.batching import right_pad  # imports torch: see EvalTask.predict
        from modrwkv.conversation import TURN_END
        from modrwkv.generation import GenerationConfig, generate
        from modrwkv.tokenizer import END_OF_TEXT

        config = GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=0,
                                  stop_tokens=(*tokenizer.encode(TURN_END), END_OF_TEXT))
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            batch = slice(start, start + self.batch_size)
            said = [[] for _ in prompts[batch]]

            def ends_turn(row: int, token: int) -> bool:
                # the turn's end may come inside other tokens ("。\n" then "\n"), not as the "\n\n" token
                said[row].append(token)
                return TURN_END in tokenizer.decode(said[row])

            ids, mask, _ = right_pad(prompts[batch], device=model.backbone.emb.weight.device)
            first, state = model.prefill(ids, features[batch], attention_mask=mask)
            out = generate(model.backbone, prompts[batch], config, state=state, first_logits=first, on_token=ends_turn)
            # stopped: False where the answer ran to max_new_tokens (cut short, or never ending its turn)
            rows += [{"prediction": tokenizer.decode(t).split(TURN_END)[0].strip(), "stopped": stopped}
                     for t, stopped in zip(out.tokens, out.stopped)]
        return [{**r, **self.references(s)} for s, r in zip(samples, rows)]

    @staticmethod
    def references(sample: "Sample") -> dict:
        """The reference answer, and what scoring reads beside it: a VQAv2 question's annotators' answers, a
        multiple-choice question's options."""
        return {"reference": sample.text("assistant"), **{k: sample.meta[k] for k in ("answers", "options")
                                                           if k in sample.meta}}

    def unanswered(self, sample: "Sample") -> dict:
        """Scored as an empty answer: wrong for VQA, every word deleted for ASR. A sample the model cannot read is
        one it fails; left out, the test set's score would be over the samples it can."""
        return {"prediction": "", "stopped": True, **self.references(sample)}


@dataclass
class VQA(DecodeTask):
    """Exact match after VQAv2 normalisation against the reference answer (`accuracy`), and when every sample
    carries its annotators' answers (a VQAv2-style test set), VQAv2's accuracy by their rule (`vqa_accuracy`, what
    published tables report), each beside the best constant answer's (given to every question: what a model that
    ignores the image can reach; for `accuracy` the most frequent reference after the same normalisation, for
    `vqa_accuracy` the answer that scores best by its rule, `best_constant_answer`; taken from the test answers, as
    evaluation sees no training answers, so an upper bound on a training-majority guess); a confusion matrix.
    When every sample is a multiple-choice question (its record's `options`, its answer naming a letter:
    ScienceQA, MMBench), the share of replies naming the right option by letter or text (`choice_accuracy`; one
    pass, not MMBench's CircularEval) beside the letter right most often, and the replies naming none
    (`choice_unparsed`, counted wrong); when every reference is yes or no (POPE), POPE's accuracy, precision,
    recall and F1 of "yes", yes ratio and unparsed replies (`pope_*`, which POPE's script would call yes) beside
    "yes" to every question."""

    modality: ClassVar[str] = "image"

    def score(self, rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
        predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        keys = [answer_key(r) for r in references]  # the references as the metric tells them apart
        label = Counter(keys).most_common(1)[0][0]
        majority = [references[keys.index(label)]] * len(rows)  # as a reference spells it
        metrics = {"accuracy": mean_exact_match(predictions, references)}
        baselines = {"accuracy": mean_exact_match(majority, references)}
        annotated = sum("answers" in r for r in rows)
        if annotated == len(rows):
            answers = [r["answers"] for r in rows]
            metrics["vqa_accuracy"] = mean_vqa_accuracy(predictions, answers)
            baselines["vqa_accuracy"] = mean_vqa_accuracy([best_constant_answer(answers)] * len(rows), answers)
        elif annotated:
            print(f"vqa: {annotated} of {len(rows)} samples carry annotators' answers: no vqa_accuracy (it needs "
                  "every sample's)")
        with_options = sum("options" in r for r in rows)
        if with_options == len(rows):
            options = [r["options"] for r in rows]
            right = [answer_letter(r, len(o)) for r, o in zip(references, options)]
            metrics["choice_accuracy"] = choice_accuracy(predictions, right, options)
            constant = Counter(right).most_common(1)[0][0]
            baselines["choice_accuracy"] = right.count(constant) / len(rows)
            # replies naming no option, counted wrong (LLaVA's ScienceQA script gives them a random option)
            metrics["choice_unparsed"] = sum(extract_choice(p, o) is None for p, o in zip(predictions, options))
            baselines["choice_unparsed"] = 0
        elif with_options:
            print(f"vqa: {with_options} of {len(rows)} samples are multiple-choice questions: no choice_accuracy (it "
                  "needs every sample's options)")
        if set(keys) <= {"yes", "no"}:
            metrics.update(pope_scores(predictions, keys).metrics())
            baselines.update(pope_scores(["yes"] * len(rows), keys).metrics())
            print(f"vqa: every reference is yes or no: POPE's scores too (pope_*; {metrics['pope_unparsed']:.0f} "
                  "replies neither yes nor no, which POPE's script would call yes)")
        return metrics, baselines

    @staticmethod
    def confusion(rows: list[dict]) -> tuple[list[str], np.ndarray]:
        """The answers (as the metric tells them apart: `answer_key`) and counts[reference, prediction], the last
        column any answer outside the set or none (a skipped sample's): its diagonal is what `accuracy` counts."""
        labels = sorted({answer_key(r["reference"]) for r in rows})
        index = {label: i for i, label in enumerate(labels)}
        counts = np.zeros((len(labels), len(labels) + 1), dtype=int)
        for r in rows:
            predicted = index.get(answer_key(r["prediction"]), -1) if r["prediction"].strip() else -1
            counts[index[answer_key(r["reference"])], predicted] += 1
        return labels, counts

    def plots(self, tally: KeptRows, out_dir: Path) -> list[Path]:
        """Reference vs prediction counts, when the answers form a small closed set (e.g. digit words)."""
        labels, counts = self.confusion(tally.rows)
        if not 2 <= len(labels) <= 30:
            return []
        fig = figure(figsize=(7, 6))
        ax = fig.subplots()
        ax.imshow(counts, cmap="Blues")
        ax.set_xticks(range(len(labels) + 1), labels + ["other"], rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set(xlabel="prediction", ylabel="reference", title="confusion matrix")
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, n, ha="center", va="center", fontsize=8)
        return [save_figure(fig, out_dir / "confusion_matrix.png")]


@dataclass
class ASR(DecodeTask):
    """WER on English and CER on Mandarin, each beside the empty transcript. Rows in another language (or none)
    are not scored but counted (`rows_unscored`), never dropped unsaid; none scored at all is an error."""

    modality: ClassVar[str] = "audio"
    RATES: ClassVar[dict] = {"en": word_error_rate, "zh": lambda r, h: character_error_rate(r, h, "zh")}

    def score(self, rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
        metrics, baselines = {}, {}
        for language, rate in self.RATES.items():
            mine = [r for r in rows if r.get("language") == language]
            if mine:
                references = [r["reference"] for r in mine]
                result = rate(references, [r["prediction"] for r in mine])
                metrics[f"{result.metric}_{language}"] = result.rate
                baselines[f"{result.metric}_{language}"] = rate(references, [""] * len(mine)).rate
        unscored = [r for r in rows if r.get("language") not in self.RATES]
        others = sorted({str(r.get("language")) for r in unscored})
        if not metrics:
            raise ValueError(f"no row to score: ASR scores languages {sorted(self.RATES)}, the rows have {others}")
        if unscored:
            metrics["rows_unscored"] = len(unscored)
            print(f"ASR: {len(unscored)} rows not scored, in languages {others} (scored: {sorted(self.RATES)})")
        return metrics, baselines


@dataclass
class Forecast(EvalTask):
    """The forecast head's horizon: MSE/MAE on both scales and MASE, beside the seasonal-naive forecast; a plot of
    forecasts against the truth. `batch_size` windows are forecast in one pass of the model."""

    modality: ClassVar[str] = "series"
    # 720 values a window at the paper's lookback, already in the cache beside the row's key
    unsaved: ClassVar[tuple[str, ...]] = ("lookback",)
    season: int = 1  # the seasonal-naive baseline's period (1 = naive)
    batch_size: int = 16

    def answer(self, model, tokenizer, samples: list["Sample"], prompts: list[list[int]], features: list) -> list[dict]:
        import torch  # see EvalTask.predict

        from modrwkv.batching import right_pad

        rows, device = [], model.backbone.emb.weight.device
        for start in range(0, len(prompts), self.batch_size):
            batch = slice(start, start + self.batch_size)
            ids, mask, _ = right_pad(prompts[batch], device=device)
            lengths = {len(s.lookback) for s in samples[batch]}
            if len(lengths) > 1:
                raise ValueError(f"the windows from {samples[start].key} on have lookbacks of {sorted(lengths)} "
                                 "steps: a cache's windows share one length (an encode job cuts one)")
            lookback = torch.from_numpy(np.stack([s.lookback for s in samples[batch]])).float().to(device)
            # no logits: a forecast reads the head's hidden state (16 x 65,536 x ~740 logits would be ~3 GB)
            forecasts = model(ids, features[batch], attention_mask=mask, series_lookback=lookback,
                              return_logits=False).forecast.float().cpu().numpy()
            rows += [{"prediction": shortest_float32(forecast),
                      "reference": shortest_float32(sample.target), "lookback": sample.lookback.tolist(),
                      "mean": sample.meta["mean"], "std": sample.meta["std"],
                      # cached before the reader recorded it: no standardized errors
                      "train_std": sample.meta.get("train_std")}
                     for sample, forecast in zip(samples[batch], forecasts)]
        return rows

    def tally(self) -> "ForecastTally":
        return ForecastTally(self.season)

    def score(self, rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
        tally = self.tally()
        tally.add(rows)
        return tally.result()

    def plots(self, tally: "ForecastTally", out_dir: Path) -> list[Path]:
        """Lookback, truth and forecast of a few windows (`ForecastTally.shown`), on the original scale."""
        shown = tally.shown.rows()
        fig = figure(figsize=(7, 2.2 * len(shown)))
        axes = fig.subplots(len(shown), 1, squeeze=False)
        for ax, r in zip(axes[:, 0], shown):
            lookback, truth, forecast = (np.asarray(r[k]) * r["std"] + r["mean"]
                                         for k in ("lookback", "reference", "prediction"))
            future = np.arange(len(lookback), len(lookback) + len(truth))
            ax.plot(np.arange(len(lookback)), lookback, color="gray", label="lookback")
            ax.plot(future, truth, color="black", label="truth")
            ax.plot(future, forecast, color="tab:red", label="forecast")
            ax.set_title(r["key"], fontsize=9)
        axes[0, 0].legend(fontsize=8)
        return [save_figure(fig, out_dir / "forecast_vs_truth.png")]


def shortest_float32(values) -> list[float]:
    """float32 values as the shortest decimals that read back as them: half the JSON of their float64 digits."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


@dataclass
class ForecastTally(Tally):
    """The forecasts' and the seasonal-naive forecasts' error sums, and the few windows the plot shows."""

    season: int
    model: ForecastErrors = field(init=False)
    naive: ForecastErrors = field(init=False)
    shown: RowSample = field(default_factory=lambda: RowSample(4))

    def __post_init__(self):
        self.model, self.naive = ForecastErrors(self.season), ForecastErrors(self.season)

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        prediction, target, lookback = (np.array([r[k] for r in rows]) for k in ("prediction", "reference", "lookback"))
        std, train_std = [r["std"] for r in rows], [r.get("train_std") for r in rows]
        train_std = None if None in train_std else train_std
        self.model.add(prediction, target, std, lookback, train_std)
        self.naive.add(seasonal_naive(lookback, target.shape[1], self.season), target, std, lookback, train_std)
        self.shown.add(rows)

    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        metrics = self.model.result()
        baselines = {k: v for k, v in self.naive.result().items() if not k.startswith("windows_")}  # the same counts
        if metrics.get("windows_without_mase"):  # flat stretches (zero sales, a stuck sensor): MSE counts them
            print(f"forecast: {metrics['windows_without_mase']} of {self.shown.seen} windows repeat exactly with "
                  f"period {self.season} in their lookback: left out of MASE")
        return metrics, baselines


TASKS: dict[TaskName, type[EvalTask]] = {"vqa": VQA, "asr": ASR, "forecast": Forecast}
