"""Patient-level diagnosis: a patient's cells and clinical covariates -> one call (APL vs other AML on DeepAPL).

`bags` builds the per-patient table (label, covariates, cell-type shares, each patient's cell rows); `models`
holds the patient-level estimators (scikit-learn style: fit / predict_proba on a `PatientBags`); `crossval` scores
them by repeated stratified cross-validation by patient, every threshold chosen inside the training folds.
"""
