"""CheXQuery model (work in progress: constants first)."""

# The 14 CheXpert observations, in the CheXpert labeler's order. The condition
# queries, the auxiliary head's logits and every label vector use this order.
CONDITIONS = (
    'No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
    'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis',
    'Pneumothorax', 'Pleural Effusion', 'Pleural Other', 'Fracture', 'Support Devices',
)
# One anatomical query per region, in this order.
REGIONS = ('cardiac', 'left lung', 'right lung', 'mediastinum', 'diaphragm', 'spine')
