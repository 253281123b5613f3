"""fastai tabular Learner on a generated census-style table (the fast.ai tabular tutorial's recipe, generated data)."""
import numpy as np
import pandas as pd
from fastai.tabular.all import (Categorify, CategoryBlock, FillMissing, Normalize, TabularDataLoaders, accuracy,
                                set_seed, tabular_learner)

set_seed(0)
rng = np.random.default_rng(3)
n_rows = 3000
table = pd.DataFrame({
    "age": rng.integers(17, 80, n_rows).astype(float),
    "hours_per_week": rng.normal(40, 10, n_rows).round(),
    "education_num": rng.integers(1, 17, n_rows).astype(float),
    "workclass": rng.choice(["Private", "Self-emp", "Local-gov", "State-gov"], n_rows),
    "marital_status": rng.choice(["Married", "Never-married", "Divorced"], n_rows, p=[0.5, 0.35, 0.15]),
    "occupation": rng.choice(["Exec-managerial", "Craft-repair", "Sales", "Tech-support", "Other-service"], n_rows),
})
table.loc[rng.random(n_rows) < 0.05, "education_num"] = np.nan  # a few blanks, as in the real census table
score = (0.06 * (table.age - 40) + 0.08 * (table.hours_per_week - 40) + 0.35 * (table.education_num.fillna(9) - 9)
         + 1.5 * (table.marital_status == "Married") + 1.0 * (table.occupation == "Exec-managerial")
         - 0.8 * (table.occupation == "Other-service") + 0.3 * rng.normal(size=n_rows))
table["salary"] = np.where(score > np.median(score), ">=50k", "<50k")

dls = TabularDataLoaders.from_df(
    table, y_names="salary", y_block=CategoryBlock(),
    cat_names=["workclass", "marital_status", "occupation"],
    cont_names=["age", "hours_per_week", "education_num"],
    procs=[Categorify, FillMissing, Normalize], valid_idx=list(range(2400, n_rows)), bs=64, num_workers=0)
learn = tabular_learner(dls, metrics=accuracy)
with learn.no_bar():
    learn.fit_one_cycle(4, 1e-2)
    acc = float(learn.validate()[1])
print(f"final_metric accuracy {acc:.4f}")
