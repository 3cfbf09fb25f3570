"""Stand-in for comfy.model_sampling: EDM sigmas with v-prediction, as SVD img2vid uses them
(``V_PREDICTION`` + ``ModelSamplingContinuousEDM``: the same method names and formulas)."""
import torch


class V_PREDICTION:
    sigma_data = 1.0

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return (model_input * self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
                - model_output * sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5)


class ModelSamplingContinuousEDM(torch.nn.Module):
    def __init__(self, sigma_min=0.002, sigma_max=700.0, sigma_data=1.0):
        super().__init__()
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def timestep(self, sigma):
        return 0.25 * sigma.log()


class SVDSampling(ModelSamplingContinuousEDM, V_PREDICTION):
    """What ComfyUI's model_sampling() builds for ModelType.V_PREDICTION_EDM."""
