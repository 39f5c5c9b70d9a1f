"""On top of the pipeline: comparing methods over seeds (compare), tuning them (tune), reading run folders
(results), paired statistics (stats) and the HTML report (report)."""
