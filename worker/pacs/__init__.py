"""The PACS programs: `lungcam dicom-listen` (C-STORE SCP), `lungcam dicom-send` (results as DICOM SR and
Secondary Capture) and `lungcam ingest dicomweb+http(s)://...` (QIDO-RS / WADO-RS pull). See docs/pacs.md."""
