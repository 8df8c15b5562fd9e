"""Zero-shot prompts for the phantom's findings: label name -> (positive prompts, negative prompts).

Several phrasings per side, in the wording of radiology reports (the phantom's report templates,
unimedi_jax/data/phantom.py, use the same vocabulary). A finding's score is the image's cosine
with the mean positive embedding minus that with the mean negative one (prompt ensembling,
CLIP §3.1.4), in `unimedi_jax.eval.zero_shot`. For another dataset, give its label names.
"""

PHANTOM = {
    "nodule": (("There is a pulmonary nodule.", "A nodule is seen in the lung.",
                "Pulmonary nodule."),
               ("No pulmonary nodules.", "There is no nodule or mass.",
                "No suspicious pulmonary nodule is seen.")),
    "consolidation": (("There is consolidation.", "Focal consolidation is present.",
                       "Airspace consolidation."),
                      ("There is no consolidation.", "No focal consolidation.",
                       "No airspace consolidation is seen.")),
    "ground_glass": (("There are ground-glass opacities.", "Patchy ground-glass opacity.",
                      "Ground-glass opacification."),
                     ("There are no ground-glass opacities.", "No ground-glass opacity.",
                      "No ground glass attenuation.")),
    "effusion": (("There is a pleural effusion.", "Pleural effusion is present.",
                  "Pleural effusion."),
                 ("There is no pleural effusion.", "No pleural effusion.",
                  "No pleural effusion is seen.")),
    "cardiomegaly": (("The heart is enlarged.", "Cardiomegaly.",
                      "The cardiac silhouette is enlarged."),
                     ("Heart size is normal.", "Normal heart size.",
                      "The cardiac silhouette is within normal limits.")),
}
