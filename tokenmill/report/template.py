"""The report's HTML (a Jinja2 template, rendered with autoescape on)."""

REPORT_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tokenmill run report</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
 h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
 table { border-collapse: collapse; margin: .5em 0 1em; }
 td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
 th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 img { max-width: 100%; display: block; margin: .5em 0; }
 .muted { color: #666; }
</style>
</head>
<body>
<h1>tokenmill run report</h1>
<p class="muted">Run: <code>{{ run.root }}</code>. Every figure below is read from the run's manifests,
progress records and metrics.</p>

<h2>Stages</h2>
<table>
<tr><th>resource</th><th>stage</th><th>phase</th><th>committed</th></tr>
{% for section in sections %}
<tr><td>{{ section.label }}</td><td>{{ section.stage }}</td>
<td>{% for key, value in section.facts if key == "phase" %}{{ value }}{% endfor %}</td>
<td>{% for key, value in section.facts if key in ("rows committed", "tokens", "checkpoint") %}{{ key }} {{ value }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>
{% endfor %}
</table>

<h2>Held-out evaluation</h2>
{% if evaluation %}
<p>{{ evaluation.models.values() | map(attribute="problems") | first }} problems from
<code>{{ evaluation.problems }}</code>, judged by the {{ evaluation.oracle }} oracle; success rate is the
share of {{ (evaluation.models.values() | first).samplesPerProblem }} samples per problem at temperature
{{ evaluation.temperature }} the oracle accepts (± its standard error over problems).</p>
<table id="evaluation">
<tr><th>model</th><th>greedy accuracy</th><th>success rate</th><th>problems</th></tr>
{% for label, figures in evaluation.models.items() %}
<tr><td>{{ label }}</td><td class="num">{{ "%.3f" | format(figures.greedyAccuracy) }}</td>
<td class="num">{{ "%.3f" | format(figures.successRate) }} ± {{ "%.3f" | format(figures.successRateStderr) }}</td>
<td class="num">{{ figures.problems }}</td></tr>
{% endfor %}
</table>
{% else %}
<p class="muted">This run has no evaluation (<code>_evaluation/evaluation.json</code> is missing).</p>
{% endif %}

{% for section in sections %}
<h2>{{ section.label }}{% if section.stage %} ({{ section.stage }}){% endif %}</h2>
<table>
{% for key, value in section.facts %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}
</table>
{% for image in section.images %}<img src="{{ image }}" alt="{{ section.label }}">
{% endfor %}
{% if section.dropped %}
<table>
<tr><th>step</th><th>dropped because</th><th>count</th></tr>
{% for step, reason, count in section.dropped %}<tr><td>{{ step }}</td><td>{{ reason }}</td><td class="num">{{ count }}</td></tr>
{% endfor %}
</table>
{% endif %}
{% endfor %}
</body>
</html>
"""
