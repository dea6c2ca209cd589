//! [`ConvBackend`] on NdArray: the tensors' host memory handed to the CPU kernels of
//! [`cpu`](super::cpu), without copies where a tensor is contiguous.

use burn::backend::NdArray;

use super::*;

impl ConvBackend for NdArray<f32> {
    fn conv2d_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, geom: ConvGeom) -> FloatTensor<Self> {
        let (xd, wd) = (dims4(&x), dims4(&weight));
        let (Some(xs), Some(ws)) = (host_f32(&x), host_f32(&weight)) else {
            return Self::conv2d(x, weight, None, geom.options());
        };
        let g = Geometry::new(xd, wd, geom);
        let out = cpu::forward(&xs, &ws, &g, cpu::Epilogue::NONE);
        NdArrayTensor::from_data(TensorData::new(out, [g.n, g.o, g.ho, g.wo]))
    }

    fn conv2d_bias_act_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        c_out: usize,
        relu: bool,
        geom: ConvGeom,
    ) -> FloatTensor<Self> {
        let (xd, wd) = (dims4(&x), dims4(&weight));
        let (Some(xs), Some(ws), Some(bs)) = (host_f32(&x), host_f32(&weight), host_f32(&bias)) else {
            return conv2d_bias_act_composed::<Self>(x, weight, bias, c_out, relu, geom);
        };
        let mut g = Geometry::new(xd, wd, geom);
        if c_out != wd[0] || xd[1] != wd[1] * geom.groups {
            assert_eq!(geom.groups, 1, "channel slicing is defined for dense convolutions");
            // The GEMM reads the block [0..c_out, 0..C] of the full weight in place.
            g.o = c_out;
        }
        let out = cpu::forward(&xs, &ws, &g, cpu::Epilogue { bias: Some(&bs), relu });
        NdArrayTensor::from_data(TensorData::new(out, [g.n, g.o, g.ho, g.wo]))
    }

    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let [n, c, h, w] = dims4(&x);
        let Some(xs) = host_f32(&x) else {
            return Self::max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
        };
        let out = cpu::max_pool2x2(&xs, [n, c, h, w]);
        NdArrayTensor::from_data(TensorData::new(out, [n, c, h / 2, w / 2]))
    }

    fn max_pool2x2_with_indices(x: FloatTensor<Self>) -> (FloatTensor<Self>, IntTensor<Self>) {
        let [n, c, h, w] = dims4(&x);
        let Some(xs) = host_f32(&x) else {
            let out = Self::max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
            return (out.output, out.indices);
        };
        let (out, idx) = cpu::max_pool2x2_with_indices(&xs, [n, c, h, w]);
        let shape = [n, c, h / 2, w / 2];
        (NdArrayTensor::from_data(TensorData::new(out, shape)), NdArrayTensor::from_data(TensorData::new(idx, shape)))
    }

    fn max_pool2x2_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        let [n, c, h, w] = dims4(&x);
        let idx = match &indices {
            NdArrayTensor::I64(s) => s.view().to_slice().map(Cow::Borrowed).unwrap_or_else(|| Cow::Owned(s.view().iter().copied().collect())),
            _ => return Self::max_pool2d_with_indices_backward(x, [2, 2], [2, 2], [0, 0], [1, 1], false, grad, indices).x_grad,
        };
        let Some(gs) = host_f32(&grad) else {
            return Self::max_pool2d_with_indices_backward(x, [2, 2], [2, 2], [0, 0], [1, 1], false, grad, indices).x_grad;
        };
        NdArrayTensor::from_data(TensorData::new(cpu::max_pool2x2_backward(&gs, &idx, [n, c, h, w]), [n, c, h, w]))
    }

    fn has_ragged_conv() -> bool {
        true
    }

    fn conv2d_bias_act_ragged(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        c_in: &[usize],
        c_out: &[usize],
        relu: bool,
        geom: ConvGeom,
    ) -> FloatTensor<Self> {
        let (xd, wd) = (dims4(&x), dims4(&weight));
        let (xs, ws, bs) = (host_f32(&x), host_f32(&weight), host_f32(&bias));
        let (Some(xs), Some(ws), Some(bs)) = (xs, ws, bs) else {
            return conv2d_bias_act_ragged_masked::<Self>(x, weight, bias, c_in, c_out, relu, geom);
        };
        let mut g = Geometry::new(xd, wd, geom);
        g.o = c_out.iter().copied().max().unwrap_or(0);
        let out = cpu::forward_ragged(&xs, &ws, &g, c_in, c_out, cpu::Epilogue { bias: Some(&bs), relu });
        NdArrayTensor::from_data(TensorData::new(out, [g.n, g.o, g.ho, g.wo]))
    }

    fn global_avg_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let [n, c, h, w] = dims4(&x);
        let Some(xs) = host_f32(&x) else {
            let x = Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(x));
            return x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c]).into_primitive().tensor();
        };
        NdArrayTensor::from_data(TensorData::new(cpu::plane_means(&xs, h * w), [n, c]))
    }

    fn conv2d_backward(
        grad: FloatTensor<Self>,
        x: Option<FloatTensor<Self>>,
        weight: Option<FloatTensor<Self>>,
        shapes: ([usize; 4], [usize; 4]),
        geom: ConvGeom,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let g = Geometry::new(shapes.0, shapes.1, geom);
        let gs = host_f32(&grad).expect("conv2d gradient is f32");
        let xs = x.as_ref().and_then(host_f32);
        let ws = weight.as_ref().and_then(host_f32);
        let (dx, dw) = cpu::backward(&gs, xs.as_deref(), ws.as_deref(), &g);
        (
            dx.map(|v| NdArrayTensor::from_data(TensorData::new(v, shapes.0))),
            dw.map(|v| NdArrayTensor::from_data(TensorData::new(v, shapes.1))),
        )
    }
}
