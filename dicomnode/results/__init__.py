"""Result objects: what the node sends back to the PACS.

Every writer takes the source CT slices (sorted in the order of the masks' axis 0),
masks ``[z, y, x]`` aligned to them (a label map with a structure table from
:mod:`~dicomnode.results.codes`, or a mapping name -> boolean mask) and an
:class:`~dicomnode.results.algorithm.AlgorithmInfo`, and returns a pydicom Dataset
that copies the source's patient and study and starts its own series.

- :func:`dicomnode.results.seg.build_seg`: DICOM-SEG (BINARY, all frames, source order)
- :func:`dicomnode.results.rtstruct.build_rtstruct`: RT Structure Set (holes kept)
- :func:`dicomnode.results.sr.build_segmentation_sr` / :func:`~dicomnode.results.sr.build_ich_sr`:
  TID 1500 Comprehensive 3D SR
- :func:`dicomnode.results.kos.build_kos`: Key Object Selection of flagged slices
- :func:`dicomnode.results.burned_in.build_burned_in_series`: Secondary Capture with the
  contours and names burned in, for viewers without SEG/RTSTRUCT (not for diagnosis)
- :func:`dicomnode.results.preview.render_montage`: PNG montage
- :func:`dicomnode.results.encode.encode_label_map`: any tool's label map -> SEG+RTSTRUCT+SR
- :func:`dicomnode.results.source.write`: save as a DICOM file
"""
