"""Serving and export: the REST API, the web viewer, FHIR and DICOM SR (the core never imports this package).

- :mod:`rrg3d.serve.app`: the FastAPI application (``create_app``), run by ``rrg3d serve``.
- :mod:`rrg3d.serve.jobs`: the sqlite job store; :mod:`rrg3d.serve.worker`: the one inference worker.
- :mod:`rrg3d.serve.uploads`: upload checks (size, zip safety, image or not) and identifier-free storage.
- :mod:`rrg3d.serve.fhir`, :mod:`rrg3d.serve.sr`: a prediction record as a FHIR DiagnosticReport or a DICOM
  Comprehensive SR; :mod:`rrg3d.serve.export`: both for a predictions file (``rrg3d export``).
- :mod:`rrg3d.serve.assets`: the NiiVue bundle, fetched from the npm registry at install time, never committed.
- ``static/``: the web page (upload, progress, NiiVue viewer, grounded report).
"""
