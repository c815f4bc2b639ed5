"""Parameters counted by the tests themselves, independently of the cost model and of cost.measure."""


def count_params(model) -> int:
    """Distinct parameter storages among every use of a tensor: a tensor tied or shared between layers counts once."""
    return sum(p.numel() for p in {p.data_ptr(): p for _, p in model.named_parameters(remove_duplicate=False)}.values())
