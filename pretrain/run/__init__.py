"""One run directory's life: its lock (``lock``; taken before torch is imported, so nothing here imports torch at
package level), Ctrl-C and SIGTERM (``interrupt``), the console and summary (``console``), the metrics files
(``loggers``), throughput accounting (``perf``), start-up warnings (``sanity``) and the global batch (``global_batch``)."""
