"""The studies behind the notebooks, on top of the library: token quality (notebook 01,
:mod:`.tokens`), generation (02, :mod:`.generation`) and transfer learning (03, :mod:`.transfer`)."""
