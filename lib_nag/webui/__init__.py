"""What NAG uses of the WebUI's sampling, for every model family: a job and its passes (the step
window, the NAG negative, the console report), A1111's row placement (``a1111_rows``) and Forge's
cloned patcher (``forge_patcher``), and the contract a model family fulfils (``family``). Imports
the WebUI's ``modules`` (the same API in A1111, Forge, reForge and Neo) only inside functions, so
the tests can import it beside stand-ins."""
