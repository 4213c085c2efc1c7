"""Real scorers for the suite's SmolLM2 tasks, from public packages nobody here wrote.

`sentiment`: VADER's compound score (`pip install vaderSentiment`), from -1 (negative) to 1 (positive): "make answers
more positive". `textblob_polarity` (`pip install textblob`) scores the same goal by another method (a pattern lexicon
with modifiers): an agent trained on one is checked on the other, so a gain that only fools one scorer shows.
"""

from functools import lru_cache


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ImportError("The sentiment task needs VADER: pip install vaderSentiment") from err
    return SentimentIntensityAnalyzer()


def sentiment(prompts, completions, **kwargs) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1]."""
    analyzer = _vader()
    return [analyzer.polarity_scores(text)["compound"] for text in completions]


def textblob_polarity(prompts, completions, **kwargs) -> list[float]:
    """TextBlob's polarity of each completion (the pattern lexicon it ships), in [-1, 1]: the sentiment goal scored
    by another method, to check that a gain on VADER is a gain in sentiment and not in VADER's quirks."""
    try:
        from textblob import TextBlob
    except ImportError as err:
        raise ImportError("The second sentiment scorer needs TextBlob: pip install textblob") from err
    return [TextBlob(text).sentiment.polarity for text in completions]
