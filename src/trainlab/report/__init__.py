"""Reports of run and sweep directories: report.md and a self-contained report.html.

    run.py       a run directory read back (load_run, read_run_file, baseline, phases, events)
    document.py  the document model (Heading, Para, Table, Figure, Code)
    markdown.py  and html.py: its two writers (html.inline_svg makes an SVG safe to inline)
    figures.py   the figures, drawn by matplotlib (imported only when a figure is drawn)
    heatmap.py   the callback that draws a run's 2-D evaluation arrays into plots/
    render.py    a run's report: build_report, write_report, report_figures
"""
