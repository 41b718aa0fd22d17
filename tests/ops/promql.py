"""The metric names a PromQL expression reads, and the metric names a /metrics page has:
enough PromQL to check a dashboard and alert rules against a real scrape."""

from __future__ import annotations

import re

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
# Series the Prometheus server makes itself, not any target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_TEMPLATE = re.compile(r"\$\w+|\$\{\w+\}")


def metric_names(expr: str) -> set[str]:
    """Every metric name `expr` selects (functions, keywords and label names left out)."""
    text = _TEMPLATE.sub("1m", expr)  # Grafana's $__rate_interval and friends
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {n for n in _NAME.findall(text) if n.lower() not in KEYWORDS}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)")
_TYPE = re.compile(r"^# TYPE (\S+) (\w+)")
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "counter": ("", "_total"),
}


def exposed_names(page: str) -> set[str]:
    """Every metric name a text-format scrape holds: its samples, and the series its
    declared families make (a labelled counter has no sample before its first increment)."""
    names: set[str] = set()
    for line in page.splitlines():
        if m := _TYPE.match(line):
            base, kind = m.groups()
            names |= {base + suffix for suffix in _SUFFIXES.get(kind, ("",))}
        elif m := _SAMPLE.match(line):
            names.add(m.group(1))
    return names
