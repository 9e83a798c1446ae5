from sd_lightning.data.split import split_indices, stable_seed


def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"img_{i}.png" for i in range(2000)]
    train, val = split_indices(ids, 0.1)
    assert (train, val) == split_indices(list(ids), 0.1)
    assert sorted(train + val) == list(range(2000))
    assert 150 < len(val) < 250


def test_adding_files_never_moves_existing_items():
    ids = [f"img_{i}.png" for i in range(500)]
    _, val = split_indices(ids, 0.2)
    before = {ids[i] for i in val}
    grown = ids[:250] + [f"new_{i}.png" for i in range(300)] + ids[250:]
    _, val2 = split_indices(grown, 0.2)
    after = {grown[i] for i in val2}
    assert before == {i for i in after if i.startswith("img_")}


def test_salt_changes_the_split_and_seeds_are_stable():
    ids = [str(i) for i in range(300)]
    assert split_indices(ids, 0.3, "a") != split_indices(ids, 0.3, "b")
    assert stable_seed(0, "x", 5) == stable_seed(0, "x", 5) != stable_seed(0, "x", 6)
